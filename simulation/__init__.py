"""Running many simulated devices on one machine: the fedrec command, runner and reports."""
