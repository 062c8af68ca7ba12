-- Runs once, when the postgres container starts on an empty data volume (/docker-entrypoint-initdb.d).
--
-- One server, one role and one database per service: MLflow and Prefect each own their database,
-- create and migrate their own tables on start, and cannot read each other's data. Neither is a
-- superuser.
--
-- Passwords are read from the container's environment with psql's \getenv (psql 15+), so none is
-- written here. An unset variable leaves the psql variable undefined, the statement fails to parse,
-- and ON_ERROR_STOP makes the container exit instead of creating a role without a password.
\set ON_ERROR_STOP on
\getenv mlflow_password MLFLOW_DB_PASSWORD
\getenv prefect_password PREFECT_DB_PASSWORD

CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;

CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER prefect;

-- By default PUBLIC may connect to every database: keep each service to its own.
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
REVOKE ALL ON DATABASE prefect FROM PUBLIC;

-- Prefect's migrations run `CREATE EXTENSION IF NOT EXISTS pg_trgm` (name search indexes). pg_trgm is a
-- trusted extension, so the owner could create it; creating it here keeps that step independent of it.
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
