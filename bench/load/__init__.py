"""How it is measured: the load generator, a measurement over a target, each process's CPU
(/proc) and a py-spy profile."""
