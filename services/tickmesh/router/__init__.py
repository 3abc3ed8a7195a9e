"""Router service: the control plane and the public orchestrator API.

It registers graphs, starts and steers lifetimes, consumes refs to durable
executions in batches, evaluates guardrail policies in process, applies join
policies and publishes the next work requests. It acts only on facts the state
service has made durable.
"""
