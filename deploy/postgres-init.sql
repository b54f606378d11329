-- Run once by the postgres image on an empty volume: the Optuna database beside MLflow's
-- (POSTGRES_DB). Two databases, as both keep an alembic_version table.
CREATE DATABASE optuna OWNER agelab;
