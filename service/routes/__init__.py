"""The HTTP routes, one concern a module, as mixins of :class:`service.ingress.HttpApi`, which
composes them and provides what they share: ``_allow``, ``_body``, ``_handle``, ``models``,
``jobs``, ``tasks``, ``limits``, ``registry_name``.
"""
