"""The core: every rule of the broker, and no wire format. Never imports grpc, aiohttp or rocksdict."""
