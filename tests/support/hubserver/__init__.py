"""A Hugging Face Hub test server speaking the real client's protocol.

`server.HubTestServer` is the server (also `python -m tests.support.hubserver.server`), `fixtures`
holds the pytest fixtures `hub_server` and `hub_env`. Nothing is imported here, so that
running the server module with `-m` does not import it twice.
"""
