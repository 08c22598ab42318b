"""Network defaults shared by the server and the client; importing this pulls in nothing heavy."""

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 7859
DEFAULT_SERVER = f"localhost:{DEFAULT_PORT}"
