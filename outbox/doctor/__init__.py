"""`outbox doctor`: every setting checked against the live services before the first run.

Each check says what it found and, when something is wrong, the command or setting that fixes
it. The core checks PostgreSQL and Kafka (`outbox.doctor.postgres`, `outbox.doctor.kafka`);
packages built on it add the checks of their own stores through the entry-point group
`outbox.doctor` (a function taking `DoctorOptions` and returning findings), so the core
imports none of them.
"""
