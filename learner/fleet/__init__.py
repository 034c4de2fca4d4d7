"""The fleet's wing: what turns robots' episodes into published params.

`store` (durable episode store, params registry) and `service` (the aiohttp service) run no jax, so a
service process never loads it; `page` is the service's read-only HTML page; `gate` decides whether a
candidate may be published; `loop` is the fleet's learner (store -> replay -> SAC rounds -> gate).
"""
