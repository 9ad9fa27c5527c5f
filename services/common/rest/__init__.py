"""The KServe v2 REST (HTTP/JSON) edge beside gRPC, over the same data plane."""
