"""The live status page of the fat tree: `python -m controller dashboard [--port P]`
(controller.dashboard.server), its pure model (model.py), the sampler (sample.py) and the page
itself (static/: HTML, vanilla JavaScript and SVG, no library, nothing from the internet)."""
