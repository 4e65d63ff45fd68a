"""The long-running service: process lifecycle, systemd, memory guard."""
