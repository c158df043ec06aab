"""The ``hesse`` command line (the outer ring: it prints, draws and writes files; the
library never imports it). Entry point: `hesse._cli.main`."""
