"""The BentoML service: serves the base pipeline with verified concept packs composed per request.

``service.service:ErasureService`` is the BentoML entry point; configuration lives in ``service/config.yaml``
(or the file ``ERASURE_SERVICE_CONFIG`` names), see ``service/README.md``."""
