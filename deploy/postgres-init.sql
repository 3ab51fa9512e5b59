-- Run once by the postgres image on an empty data volume (docker-compose.yaml): the Dagster instance gets its
-- own database next to ops-db (POSTGRES_DB=opsdb), owned by the same role.
CREATE DATABASE dagster;
