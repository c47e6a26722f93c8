"""Who may do what: credentials (an auth file of access keys and API keys, each bound to one
project and one role), the actions each role permits, and the DIS request-signature verifier.

Knows nothing of HTTP or gRPC: the doors pull the credential out of their request (a signed DIS
request, an `X-Api-Key` header, gRPC `authorization` metadata), ask `Auth` who it is, and ask
`Auth.check` before each verb. Errors are catalogue rows (broker/errors.py): 401 rows for who,
PERMISSION_DENIED for what.
"""
from broker.auth.credentials import Auth, Credentials, CredentialsError, Principal, load_credentials
from broker.auth.roles import Action, Role, permits

__all__ = ["Action", "Auth", "Credentials", "CredentialsError", "Principal", "Role", "load_credentials", "permits"]
