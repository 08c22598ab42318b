"""Code generated from protos/ by `python -m grpc_service.codegen`; never edit it by hand."""
