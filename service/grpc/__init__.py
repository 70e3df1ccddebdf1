"""The gRPC transport: the grpc.aio server, its thin servicer, protobuf <-> domain conversion, interceptors."""
