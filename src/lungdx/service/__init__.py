"""The inference service (``lungdx serve``): a FastAPI app with the radiologist's web page.

Import :func:`create_app` from ``lungdx.service.app``; FastAPI is imported only there, so
``import lungdx`` stays light.
"""
