"""Guardrail service: the policy authority.

It validates, versions and stores YAML policies per tenant, publishes the
policies in force as a leased snapshot that routers enforce in process on
every step, and evaluates steps in batches for out-of-band callers.
"""
