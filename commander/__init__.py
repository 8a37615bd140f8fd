"""The commander: publishes queued commands to devices and records their replies (`kota commander`)."""
