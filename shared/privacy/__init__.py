"""Privacy accounting for record-level (device) and user-level (central) DP."""
