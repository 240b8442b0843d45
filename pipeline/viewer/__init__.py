"""``nersemble-pipeline view``: a trained sequence in the browser (viser), rendered by the model as export renders it.

One room, one job a module: ``sequence`` loads what a viewer shows, ``camera`` turns a browser camera into the
pipeline's OpenCV convention, ``frames`` renders one view in cancellable strips, ``progressive`` schedules coarse
and full renders, ``scene`` and ``panel`` build the page, ``keyframes`` writes the camera path, ``session`` ties
one browser tab together and ``server`` serves them all.

Why viser: it is the viewer nerfstudio's users already know, maintained by that community; its web client ships
built inside the wheel, so nothing is fetched at run time; it gives the camera controls, frusta, sliders and image
panels this needs, and pushes images over one websocket per tab, so the render loop stays plain Python and torch.
"""
