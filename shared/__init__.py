"""Pure ML and privacy code shared by devices and server (no Flower imports)."""
