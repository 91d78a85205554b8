"""Offline ML, never imported by the service: data sets and the label book, training and exporting the
small model, evaluation of small / LLM / DS / DS+ and L4S distillation. Needs the train and eval extras."""
