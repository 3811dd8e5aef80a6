"""The fault suite: outages and kills against the local stack, each scenario counting what
survived. `make faults` runs the full scenarios and writes bench/results/faults.{md,json};
`make test` runs short versions of the same scenarios."""
