"""One module per unlearning method, each registering itself with ``@register("name")``.

The registry imports every module of this package; nothing else lists the methods.
"""
