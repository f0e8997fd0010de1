"""The HTTP front-end: /classify and its siblings, the page and its static files, the upload door."""
