"""The application layer: the `dpoflow` command line and what only it uses (the doctor, the deployment
sync, the init wizard, the JSON schema export, Prefect's temporary server). Imports flows and below."""
