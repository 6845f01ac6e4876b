"""Error types shared by every side; each message is one line that names the file or field."""

SERVICE_EXTRA_HINT = 'pip install -c constraints.txt -e ".[service]" (or make install)'


class PpcmiError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits with status 2."""


class DataError(PpcmiError):
    """A dataset file or folder is missing, unreadable or inconsistent."""


class KeyFileError(PpcmiError):
    """A key file is missing, has the wrong length or unsafe permissions."""


class ProtocolError(PpcmiError):
    """A message that crosses between hospital and server failed validation."""


class ConfigError(PpcmiError):
    """A configuration file or override is invalid."""


class CheckpointError(PpcmiError):
    """A checkpoint is missing, unreadable or does not match its configuration."""


class CertError(PpcmiError):
    """A TLS certificate or private key is missing, invalid, or would be overwritten."""


class ServiceError(PpcmiError):
    """The HTTPS inference service could not be reached or refused a request."""
