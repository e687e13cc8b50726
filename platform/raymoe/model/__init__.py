"""Single-device model code: no torch.distributed in here."""
