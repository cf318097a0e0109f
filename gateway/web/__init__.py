"""The self-service settings page at /me/proxy: one HTML page, its stylesheet and module."""

from gateway.web.page import settings_page_router

__all__ = ["settings_page_router"]
