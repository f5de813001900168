"""`python -m vlmtag.dj`: what to put in a Data-Juicer recipe to use vlmtag's operator."""

from vlmtag.dj import DJ_OP_NAME, OP_NAME, SERVE_DJ_NAME_ENV, default_cache_path, plugin_path


def main() -> None:
    print(f"""\
# With `pip install 'vlmtag[dj]'` Data-Juicer finds the operator by itself (entry point data_juicer.ops).
# Without it (vlmtag from a checkout), add this line to the recipe:
custom_operator_paths: ['{plugin_path()}']
process:
  - {OP_NAME}:
      api_or_hf_model: Qwen/Qwen2.5-VL-7B-Instruct
      is_api_model: true
      model_params: {{base_url: http://localhost:8000/v1}}
      # cache_path: {default_cache_path()}   (the default)
# Or keep `{DJ_OP_NAME}` in the recipe and run: {SERVE_DJ_NAME_ENV}=1 dj-process --config recipe.yaml""")


if __name__ == "__main__":
    main()
