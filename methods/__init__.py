"""Built-in methods: one file each, registered with @register_method(<file stem>)."""
