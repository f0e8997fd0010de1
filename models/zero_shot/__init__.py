"""Zero-shot classification offline (RECO): the aligned dual encoder, fusion, its build and figures."""
