"""earlyfw: a boot-time VPN kill switch."""

__version__ = "0.1.0"
