"""The call path, without Flask or the database: which service a call is, and its plan."""
