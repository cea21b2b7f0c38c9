DROP TABLE addresses;
DROP TABLE users;
