"""The moe2 coordinator: gating, planning, token fusion and the phone API."""
