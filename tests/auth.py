"""API keys of the test orgs."""

API_KEYS = "key-a:org-a,key-b:org-b"
AUTH_A = {"Authorization": "Bearer key-a"}
AUTH_B = {"Authorization": "Bearer key-b"}
