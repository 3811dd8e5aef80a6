"""The image domain: the resource's state machine, its tables and migrations, the one
transition function, and where its object lives. Used by the workers and the application."""
