"""Document branch parts: PDF opening and rasterising, text-layer and OCR word boxes, region schemes.

The render stage (``stages/render.py``) turns a PDF into one row per page: the page image at a fixed DPI
plus region-caption pairs taken from the page's words, either from the PDF text layer (pdfium) or, for
scanned pages, from tesseract OCR. Both word sources yield :class:`~ps3_engine.stages.documents.text_regions.Word`
boxes in rendered-page pixels, so the region schemes (sentences, runs of N words) never know which one
ran.
"""
