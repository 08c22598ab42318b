"""Draw Things' own gRPC protocol, served beside the documented API: FlatBuffer configurations,
fp16 image tensors, and a package-less ImageGenerationService."""
