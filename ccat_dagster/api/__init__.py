"""The pipeline REST API (FastAPI): the backend of ops-db-api's pipeline endpoints and of ops-db-ui.

``app.create_app`` builds the application; one router module per resource under ``routers/``; ``auth`` holds the
bearer tokens, ``problems`` the RFC 9457 error bodies, ``pagination`` the keyset pages. Every endpoint calls the
same domain functions as the CLI (grouping engine, pipeline apply, lineage, PROV-JSON export, launch).
"""
