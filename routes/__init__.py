"""The HTTP routes, one module per resource; ``main.create_app`` includes them."""

from routes import exports, frames, prompts, server, sessions, tracking

ROUTERS = (server.public, server.router, sessions.router, frames.router, prompts.router,
           tracking.router, exports.router)
