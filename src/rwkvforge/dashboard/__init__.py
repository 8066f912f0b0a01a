"""The bilingual (English / 中文) web dashboard: runs, compare, data, chat, system.

    ./scripts/dashboard.sh            # = rwkvforge dashboard = python -m rwkvforge.dashboard.launch

app.py (the Streamlit pages), runs.py (read-only run-folder reader), datasets.py (prepared
data), chat.py (base vs tuned answers), system.py (healthcheck), i18n.py + i18n/*.json (every
visible string), launch.py (starts `streamlit run` on 127.0.0.1).
"""
