"""The pocket organism of earlier versions: a 1.5M-parameter Qwen2 trained from scratch on template
sentences. Kept as a fast CPU fixture for the scalar and probe tests; the real organism lives one level up."""
