-- Run once by the postgres image on an empty data folder: a database per shippy service.
CREATE DATABASE vessels OWNER shippy;
CREATE DATABASE consignments OWNER shippy;
