"""Commands around training: merge, extract, resize, caption, sample and the offline quickstart."""
