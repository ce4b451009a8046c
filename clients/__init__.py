"""The ClientApp: thin Message-API handlers that call into :mod:`fedunlearn`."""
