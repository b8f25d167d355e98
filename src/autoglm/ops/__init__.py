"""Operations: load series from metrics (`series`), Holt-Winters load forecasting
(`forecast`), replica recommendations with hysteresis (`replicas`), synthetic traces for
evaluation (`trace`) and canary promotion from the server's own metrics (`canary`).
The recipe that ties them together is `autoglm.recipes.ops` (`autoglm ops forecast`)."""
