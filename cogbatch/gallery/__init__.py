"""`cogbatch gallery`: a static HTML page to look at each image beside its captions.

- build.py: result rows -> the page model (cards, counts, dates); no HTML.
- thumbs.py: the thumbnail cache beside the page, made once per image bytes, in parallel.
- html.py: the page: escaped header, embedded JSON index, page.css and page.js.
- api.py: build_gallery(), the three together, written atomically; the refresh after a run.
"""

from cogbatch.gallery.api import GalleryResult, build_gallery, default_dest, refresh_after_run
from cogbatch.gallery.build import GalleryError

__all__ = ["GalleryError", "GalleryResult", "build_gallery", "default_dest", "refresh_after_run"]
