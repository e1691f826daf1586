"""Built-in tasks: one file per task family, registered with @register_task(<file stem>)."""
