"""Server side: the FedAvg subclass that later takes deletion requests, and the ServerApp."""
